# Sourced by the gpu_*.sh scripts. Binaries travel to the device machine compressed (the carry
# limit fits one ~11 MB xz build per call), so every script starts by unpacking its own:
#
#   source "$(dirname "$0")/unpack_bin.sh"
#   BIN=$(unpack_bin "$BIN" NAME) || exit 1
#
# prints a runnable path: a .xz or .gz file unpacked to /tmp/moescope-NAME (made executable), any
# other file as given (made executable where it can be).
unpack_bin() {
  local src=$1 dest=/tmp/moescope-$2
  case "$src" in
    *.xz) xz -dc "$src" > "$dest" || { echo "unpack_bin: cannot unpack $src" >&2; return 1; } ;;
    *.gz) gunzip -c "$src" > "$dest" || { echo "unpack_bin: cannot unpack $src" >&2; return 1; } ;;
    *) [ -f "$src" ] || { echo "unpack_bin: no file $src" >&2; return 1; }
       chmod +x "$src" 2>/dev/null; echo "$src"; return 0 ;;
  esac
  chmod +x "$dest" && echo "$dest"
}
