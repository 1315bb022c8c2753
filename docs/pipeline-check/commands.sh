# Caltech101 base-to-new pipeline check: random-init vlp-demo backbone (12 layers, width 128), official
# presets (depths, lrs, batch sizes) with reduced shots/epochs. Numbers are chance: NOT CLIP results.
export HF_HUB_OFFLINE=1
DATA=${DATA:?set DATA to the folder holding caltech-101/}
vlprompt run --protocol base2new --method coop,cocoop,ivlp,vpt,maple,mpl,dpl --datasets caltech101 \
  --root "$DATA" --seeds 1 --shots 2 --epochs 1 --model vlp-demo --out runs_check --no-progress
vlprompt report runs_check --reference --out docs/pipeline-check
