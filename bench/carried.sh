# Sourced by the GPU scripts (bench/peers_gpu.sh, bench/peers_h100.sh): the wheels carried to a machine without
# network, installed into $SITE with --upgrade (a later call on the same warm machine keeps them).
#   .whl/site      bitsandbytes unpacked (CUDA 13.0 and CPU libraries only, ~3 MB instead of a 43 MB wheel) and the
#                  locked peft (the platform's 0.21.0 is older than samebox supports)
#   .whl/base      liger-kernel, einops, ninja (and a flash-attn wheel where one was carried)
#   .whl/unsloth   unsloth and what it needs (bench/peers_wheels.sh), or .whl/unsloth-lean (--lean)
install_carried() {
    [ -f .whl/site/bnb-site.tar.xz ] && tar -C "$SITE" -xJf .whl/site/bnb-site.tar.xz
    for dir in .whl/site .whl/base .whl/unsloth .whl/unsloth-lean; do
        ls "$dir"/*.whl >/dev/null 2>&1 || continue
        echo "== installing $dir ($(du -sh "$dir" | cut -f1)) into $SITE"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$dir"/*.whl 2>&1 | grep -v "Running pip as" || true
    done
}
