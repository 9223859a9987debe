#!/bin/sh
# The image's entrypoint (/usr/local/bin/qt-entrypoint, see deploy/Dockerfile).
# Assemble the weights folder ($QUALITEACHER_WEIGHTS) from symbolic links: first to the files of
# the folder mounted at $QUALITEACHER_WEIGHTS_SRC (yours: MUSIQ, CLIP-IQA, ...), then to the
# offline parameters baked into the image. Nothing already there is replaced; a folder that
# cannot be written is left as it is. Then run the command.
set -e
w="${QUALITEACHER_WEIGHTS:-/weights}"
for src in "${QUALITEACHER_WEIGHTS_SRC:-/weights-src}" "${QUALITEACHER_BAKED_WEIGHTS:-/opt/qualiteacher/weights}"; do
  if [ -d "$src" ] && [ "$src" != "$w" ] && mkdir -p "$w" 2>/dev/null && [ -w "$w" ]; then
    cp -Rsn "$src/." "$w/" 2>/dev/null || true
  fi
done
exec "$@"
