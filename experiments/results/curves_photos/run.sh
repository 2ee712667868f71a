#!/bin/bash
# Learning curves (the README's "Learning curves" section): 2000 steps, test bpd every 200, photos 32x32, the photos
# table's budget otherwise. Run from the repository root, once per seed: bash experiments/results/curves_photos/run.sh 0
set -u
seed=$1
mkdir -p runs/curves
for cfg in cinc:reverse emerging:none 1x1:none cinc:1x1; do
  conv=${cfg%%:*}; perm=${cfg##*:}
  name=$conv-quad-$perm-s$seed
  [ -f runs/curves/$name/metrics.json ] && grep -q '"finished": true' runs/curves/$name/metrics.json && continue
  echo "$(date -u +%T) start $name load $(cut -d' ' -f1-3 /proc/loadavg)" >> runs/curves/progress.log
  python -m cinc_kernels.flow train --name $name --out-dir runs/curves/$name --data photos --preset cifar10-small \
    --steps-per-level 2 --hidden-channels 32 --conv $conv --coupling quad --permutation $perm --steps 2000 \
    --batch-size 32 --lr 1e-3 --warmup 200 --eval-every 200 --sample-every 2000 --checkpoint-every 500 \
    --seed $seed --threads 1 --no-progress --device cpu > runs/curves/$name.log 2>&1
  echo "$(date -u +%T) end $name rc $? load $(cut -d' ' -f1-3 /proc/loadavg)" >> runs/curves/progress.log
done
