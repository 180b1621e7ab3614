# The GPU host's environment for this repository's vLLM tests and benchmarks. On the host, from the repo
# root, after each transfer of the offline bundle's parts (../shared/gpu/README.md):
#
#     source benchmarks/gpu_host.sh
#
# It installs the parts that have arrived (the bundle's own script), makes this checkout importable and
# its `vllm.general_plugins` entry point visible without a pip install (a dist-info in /tmp/tq-site,
# which vLLM's plugin loader finds on the path), and puts the 8B-shaped config at /tmp/models/llama8b-shape
# when its copy travelled in .gpu/tools. The host is offline and starts bare: nothing here persists.
if [ -f .gpu/tools/install-vllm-bundle.sh ]; then
    eval "$(bash .gpu/tools/install-vllm-bundle.sh)"
elif [ -f /tmp/vllm-site/.vllm-done ]; then  # a later call on the same host, the tools not carried again
    export PYTHONPATH="/tmp/vllm-site${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0
fi
TQ_SITE=/tmp/tq-site
mkdir -p "$TQ_SITE/turboquant-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: turboquant\nVersion: 0.1.0\n' > "$TQ_SITE/turboquant-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nturboquant = turboquant.vllm.plugin:register\n' \
    > "$TQ_SITE/turboquant-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$PWD:$TQ_SITE:$PYTHONPATH"
# `vllm serve` also needs uvicorn and model_hosting_container_standards, which the slim bundle leaves out.
# Download them here, then carry .gpu/serve:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/serve uvicorn h11 click \
#         model-hosting-container-standards httpx httpcore anyio jmespath supervisor certifi idna
# They go last on the path, so the host's own packages win.
if compgen -G ".gpu/serve/*.whl" > /dev/null; then
    pip install -q --no-deps --target /tmp/serve-site .gpu/serve/*.whl > /dev/null 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/serve-site"
fi
if [ -d .gpu/tools/llama8b-shape ] && [ ! -d /tmp/models/llama8b-shape ]; then
    mkdir -p /tmp/models && cp -r .gpu/tools/llama8b-shape /tmp/models/
fi
python3 -c "import importlib.metadata as m; assert any(e.name == 'turboquant' for e in m.entry_points(group='vllm.general_plugins'))" \
    && echo "# turboquant: importable from $PWD, vLLM entry point registered" >&2
