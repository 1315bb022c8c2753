# DPL [reconstructed from the paper's abstract] Caltech101 base-to-new pipeline check, re-run after the
# DPL switches were added (new default after_depth: keep; with after_depth: remove the run reproduces
# the previous check's numbers, Base 4.07 / New 2.18, exactly).
# Random-init vlp-demo backbone (12 layers, width 128), DPL's preset with reduced shots/epochs:
# the numbers are chance -- a pipeline check, NOT CLIP results and NOT DPL's accuracy.
export HF_HUB_OFFLINE=1
vlprompt run --protocol base2new --method dpl --datasets caltech101 --root $DATA --seeds 1 --shots 2 \
  --epochs 1 --model vlp-demo --out runs_check --no-progress
vlprompt report runs_check --reference --out docs/pipeline-check/dpl
# per-layer figures of the trained prompts on 8 Caltech101 test images (inspect.json)
vlprompt inspect --run runs_check/base2new/dpl/caltech101/shots2_seed1 --dataset caltech101 --root $DATA \
  --n 8 --device cpu --json docs/pipeline-check/dpl/inspect.json
