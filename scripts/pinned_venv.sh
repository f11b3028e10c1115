# Sourced by the peer-venv scripts: pinned_venv VENV PINS returns at once (printing the venv's python) when
# VENV holds exactly PINS, else creates VENV if needed and returns 1: the caller installs, then pinned_venv_done.
pinned_venv() {
    if [ -x "$1/bin/python" ] && [ "$(cat "$1/.quantmill-pins" 2>/dev/null)" = "$2" ]; then
        echo "$1/bin/python"
        return 0
    fi
    mkdir -p "$(dirname "$1")"
    rm -f "$1/.quantmill-pins"
    [ -x "$1/bin/python" ] || "${PYTHON:-python3}" -m venv "$1"
    return 1
}
pinned_venv_done() { echo "$2" > "$1/.quantmill-pins"; echo "$1/bin/python"; }
