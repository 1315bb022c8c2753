set -x
export HF_HUB_OFFLINE=1
R="--protocol base2new --datasets caltech101 --root /work/shared/data --seeds 1 --shots 2 --model vlp-tiny --epochs 1 --out runs_check --no-progress"
V=/work/main/.venv/bin/vlprompt
time $V run $R --method coop,cocoop
time $V run $R --method maple --set options.depth=3
time $V run $R --method mpl --set options.depth=4
time $V run $R --method dpl --set options.depth_image=4 --set options.depth_text=4
time $V report runs_check --reference
