# structtoken-d2: the two commands of the README, and the set-up step both run.
PY := .venv/bin/python
.PHONY: setup test demo clean

setup:  ## create .venv and install torch, detectron2, the requirements and this project (idempotent)
	bash tools/setup_env.sh

test: setup  ## run the test suite (CUDA tests skip without a GPU)
	$(PY) -m pytest tests -q -rs

demo: setup  ## the main job: train a small StructToken on the synthetic shapes set, then evaluate it with multi-scale + flip
	$(PY) tools/train_net.py --config-file configs/synthetic/structtoken_shapes.yaml

clean:
	rm -rf build structtoken_d2/*.so *.egg-info
