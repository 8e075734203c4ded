#!/usr/bin/env bash
# Rebuilds dashboard/assets/plotly-gradwatch.min.js from plotly.js's npm package (the full
# bundle that the plotly wheel ships is 4.8 MB and took ~1 s of script evaluation per page load on
# the 2-core box; this one is 1.3 MB and ~0.1 s). Needs node and npm; nothing is installed outside
# a temporary folder.
set -euo pipefail
PLOTLY_JS=4.1.1   # the plotly.js of the plotly wheel this was built against (plotly 7.1.0)
ESBUILD=0.28.2
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../assets/plotly-gradwatch.min.js"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$here/entry.js" "$tmp/"
cd "$tmp"
npm install --no-audit --no-fund --silent "plotly.js@$PLOTLY_JS" "esbuild@$ESBUILD"
./node_modules/.bin/esbuild entry.js --bundle --minify --format=iife --global-name=Plotly --target=es2016 \
  --define:global=window --define:define.amd=false --define:process.env.NODE_DEBUG=false \
  --alias:stream=stream-browserify --loader:.css=empty --legal-comments=eof \
  --banner:js="/* plotly.js v$PLOTLY_JS, traces: scatter heatmap treemap (gradwatch partial bundle: dashboard/plotly-bundle/build.sh) */" \
  --outfile="$out"
ls -l "$out"
