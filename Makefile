# structtoken-d2: the two commands of the README, and the set-up step both run.
PY := .venv/bin/python
.PHONY: setup test demo clean

setup:  ## create .venv and install torch, detectron2, the requirements and this project (idempotent)
	bash tools/setup_env.sh

test: setup  ## run the test suite (CUDA tests skip without a GPU)
	$(PY) -m pytest tests -q -rs

demo: setup  ## the main job: train a small StructToken on the synthetic shapes set (training ends by evaluating it with multi-scale + flip and drawing its curves), then draw and measure its token maps
	$(PY) tools/train_net.py --config-file configs/synthetic/structtoken_shapes.yaml
	$(PY) tools/visualize_tokens.py --config-file configs/synthetic/structtoken_shapes.yaml \
		--dataset shapes_sem_seg_val --num 3 --measure --output output/structtoken_shapes/token_maps \
		MODEL.WEIGHTS output/structtoken_shapes/model_final.pth

clean:
	rm -rf build structtoken_d2/*.so *.egg-info
