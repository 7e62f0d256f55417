# The two commands a fresh clone needs (see README.md):
#   make demo   set up everything, build the demo shop, feast apply + materialize, show live features
#   make test   set up everything and run the whole test suite
.PHONY: setup demo test protos bench lock

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/recsys demo

test: setup
	.venv/bin/python -m pytest --durations=25 $(PYTEST_ARGS)

# Regenerate the committed gRPC code after editing protos/ (a test fails when it is stale).
protos: setup
	.venv/bin/python -m scripts.gen_protos

bench: setup
	.venv/bin/python -m bench.online_reader_bench
	.venv/bin/python -m bench.triton_bench

# Re-pin after changing dependencies in pyproject.toml / requirements/triton.txt.
lock:
	scripts/lock.sh
