"""The gateway: RecommendService (Recommend, Rank) over gRPC, from Feast features, a faiss index and Triton.
Serving code only: it imports the shared contract and rpc plumbing, never training (scorer/) or the feedback service."""
