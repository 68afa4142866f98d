#!/usr/bin/env bash
# Create ./.venv-export: the environment tools/export_corpus.py runs in, kept apart from .venv
# because pytorch-widedeep needs numpy<2 and the recommender libraries pull torch.
# Safe to run again: pip only installs what is missing.
#
# Install notes (issue 4):
# - torch is pinned (the CPU wheel); never an unpinned torch.
# - pytorch-widedeep is installed with --no-deps and only the dependencies its tabular and rec models
#   use: torchvision's PyPI wheel fails beside the CPU torch ("operator torchvision::nms does not
#   exist"), and gensim, spacy, opencv, transformers serve only its text and image models
#   (tools/export_corpus.py stands in for them at import).
# - torchrec declares the CUDA fbgemm-gpu: it is installed with --no-deps beside fbgemm-gpu-cpu of
#   the matching release, and torchrec's other dependencies are named here.
# - deepctr-torch imports requests without declaring it (and asks the network for its version at
#   import; tools/export_corpus.py answers that offline).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
if [ ! -x .venv-export/bin/python ]; then
    "$python" -m venv .venv-export
fi
pip=(.venv-export/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0" "numpy<2" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0" requests
"${pip[@]}" "deepctr-torch==0.3.0" scikit-learn tqdm "pandas<3" scipy einops wrapt
"${pip[@]}" --no-deps "pytorch-widedeep==1.7.0" "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0"
"${pip[@]}" tensordict pyre-extensions "torchmetrics==1.0.3"
