#!/usr/bin/env bash
# Copy the gpt-fast peer (../shared/bench and ../shared/peers) into .bench/ of this checkout, a git-ignored folder
# that a device `run` call names in `carry`, so that .bench/bench/peer_gptfast.py finds ../peers/gpt-fast there.
#
#   scripts/prepare_device_carry.sh [SHARED_DIR]
#
# SHARED_DIR: the project's shared/ folder; default: ../shared beside the main checkout (found through git, so
# this works from a worktree too). Run it in the checkout the device call sends: the session's own checkout.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
main=$(cd "$(git rev-parse --git-common-dir)/.." && pwd)
shared=${1:-}
if [ -z "$shared" ]; then
  for c in "$root/../shared" "$main/../shared"; do
    if [ -d "$c/bench" ]; then shared=$c; break; fi
  done
fi
[ -n "$shared" ] && [ -f "$shared/bench/peer_gptfast.py" ] && [ -d "$shared/peers/gpt-fast" ] \
  || { echo "no shared/bench/peer_gptfast.py and shared/peers/gpt-fast found (pass SHARED_DIR)" >&2; exit 1; }
cd "$root"
git check-ignore -q .bench/x || { echo ".bench/ is not git-ignored here: add /.bench/ to .gitignore" >&2; exit 1; }
rm -rf .bench
mkdir -p .bench
# No .git, caches or files over 1 MiB: the peer is a few Python files.
for d in bench peers; do
  (cd "$shared" && find "$d" -type f -size -1024k ! -path '*/.git/*' ! -path '*/__pycache__/*' ! -name '*.pyc' -print0) \
    | (cd "$shared" && xargs -0 -I{} cp --parents {} "$root/.bench/")
done
chmod -R u+w .bench
kib=$(du -sk .bench | cut -f1)
echo "prepared $root/.bench from $shared: $(find .bench -type f | wc -l) files, ${kib} KiB"
# The device call's limit is 64 MiB for the tracked files, the untracked-not-ignored ones and every carried path.
tree_kib=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total=$((kib + tree_kib))
echo "working tree that travels: ~${tree_kib} KiB + .bench ${kib} KiB = ~$((total / 1024)) MiB of 64 MiB"
[ "$total" -lt $((60 * 1024)) ] || { echo "over 60 MiB: trim before the call" >&2; exit 1; }
