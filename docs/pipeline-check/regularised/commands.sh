# Caltech101 base-to-new pipeline check of the regularised baselines (KgCoOp, ProGrad, PromptSRC):
# random-init vlp-demo backbone, official presets with reduced shots/epochs. A pipeline check only:
# the numbers are chance, NOT CLIP results.
export HF_HUB_OFFLINE=1
DATA=${DATA:?set DATA to the folder holding caltech-101/ (CoOp layout)}
vlprompt run --protocol base2new --method kgcoop,prograd,promptsrc --datasets caltech101 \
  --root "$DATA" --seeds 1 --shots 2 --epochs 1 --model vlp-demo --out runs_check --no-progress
vlprompt report runs_check --reference --out docs/pipeline-check/regularised
