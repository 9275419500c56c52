#!/usr/bin/env bash
# Entrypoint of images built with `samebox image --with workstation`, on AutoDL's conventions: TensorBoard on port
# 6007 over /root/tf-logs (where `samebox train` logs when that directory exists), JupyterLab on 8888 with /root as
# its root. The Jupyter token comes from $JUPYTER_TOKEN at `docker run -e JUPYTER_TOKEN=...`, never from the image;
# unset, JupyterLab makes a random one and prints it in its log. Without a command JupyterLab runs in front; with
# one (`docker run IMAGE samebox train ...`) both run in the background and the command runs in front.
set -euo pipefail
tf_logs=${SAMEBOX_TF_LOGS:-/root/tf-logs} logs=${SAMEBOX_LOG_DIR:-/var/log/samebox}
mkdir -p "$tf_logs" "$logs"
tensorboard --logdir "$tf_logs" --host 0.0.0.0 --port "${TENSORBOARD_PORT:-6007}" >"$logs/tensorboard.log" 2>&1 &
jupyter=(jupyter lab --ip 0.0.0.0 --port "${JUPYTER_PORT:-8888}" --no-browser --allow-root
         "--ServerApp.root_dir=${SAMEBOX_NOTEBOOK_DIR:-/root}")
if [ -z "${JUPYTER_TOKEN:-}" ]; then
    echo "samebox workstation: JUPYTER_TOKEN is not set; JupyterLab makes a random token (see its log)" >&2
fi
if [ "$#" -eq 0 ]; then
    exec "${jupyter[@]}"
fi
"${jupyter[@]}" >"$logs/jupyter.log" 2>&1 &
exec "$@"
