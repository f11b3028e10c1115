#!/usr/bin/env bash
# giftless 0.6.2, a real Git LFS server, in its own virtualenv (never a dependency of quantmill): the
# git + LFS publish tests (tests/publish/test_publish_lfs.py) serve it on 127.0.0.1 with waitress.
# Created under ~/.cache/quantmill/giftless-venv (or $QUANTMILL_GIFTLESS_VENV) when missing, with
# pinned versions; idempotent (a marker file records the pins once everything installed).
# giftless 0.6.2's wheel declares no dependencies, so its whole runtime set is pinned here.
# PyJWT stays below 2.10: from 2.10 on, decoding rejects a token whose "sub" is not a string, and
# giftless signs its pre-authorized upload actions for the anonymous user with "sub": null, so every
# LFS upload would fail with "401 User identity is required".
# Prints the venv's python on stdout: `export QUANTMILL_GIFTLESS_PYTHON=$(bash scripts/lfs_server.sh)`.
set -euo pipefail
VENV=${QUANTMILL_GIFTLESS_VENV:-$HOME/.cache/quantmill/giftless-venv}
PINS="giftless==0.6.2 PyJWT==2.9.0 waitress==3.0.2 Flask==3.1.3 Werkzeug==3.1.9 Jinja2==3.1.6 MarkupSafe==3.0.4 \
itsdangerous==2.2.0 click==8.5.1 blinker==1.9.0 Flask-Classful==0.16.0 flask-marshmallow==1.5.0 marshmallow==4.4.0 \
webargs==8.7.1 figcan==0.0.4 PyYAML==6.0.4 python-dotenv==1.2.4 python-dateutil==4.0.0 typing_extensions==4.16.0 \
packaging==26.4 cachetools==8.0.2 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 \
charset-normalizer==3.5.3 tzdata==2026.6"
source "$(dirname "$0")/pinned_venv.sh"
pinned_venv "$VENV" "$PINS" && exit 0
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip --disable-pip-version-check -q install $PINS >&2
# (giftless.app, not giftless.wsgi_entrypoint: importing that one builds the app and its ./lfs-storage)
"$VENV/bin/python" -c "import giftless.app, waitress, jwt; assert jwt.__version__ == '2.9.0'" >&2
pinned_venv_done "$VENV" "$PINS"
