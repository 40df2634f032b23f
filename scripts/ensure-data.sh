#!/usr/bin/env bash
# Install Debian's Fashion-MNIST (the default dataset) when it is missing.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST IDX files under $dir)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," >&2
  echo "or put its IDX files in \$BENCH_DATA_DIR/fashion-mnist (see 'bench data')." >&2
  exit 1
fi
