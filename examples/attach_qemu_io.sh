#!/usr/bin/env bash
# Attach an NBD export with qemu-io, write a byte pattern and read it back.
#
#   attach_qemu_io.sh [-r] URI [OFFSET [LENGTH [PATTERN]]]
#
#   URI      nbd://HOST[:PORT]/EXPORT  or  nbd+unix:///EXPORT?socket=PATH
#            (nbds:// and nbds+unix:// for TLS need qemu's --object
#            tls-creds; use qemu-io directly for those)
#   -r       read-only: do not write, only check that the range already
#            holds the pattern (e.g. on a read-only golden export)
#   OFFSET   byte offset (default 0), LENGTH bytes (default 1M),
#   PATTERN  byte value 0-255 (default 0xa5)
#
# Exit status: 0 when the pattern reads back, 1 when it does not or the
# export cannot be reached, 2 on a usage error.
#
# Example, against `nbdqcow serve --socket /tmp/nbd.sock -x disk disk.qcow2`:
#   ./attach_qemu_io.sh 'nbd+unix:///disk?socket=/tmp/nbd.sock' 64K 4K 0x5a
set -euo pipefail

usage() {
    echo "usage: ${0##*/} [-r] URI [OFFSET [LENGTH [PATTERN]]]" >&2
    exit 2
}

read_only=no
if [ "${1:-}" = "-r" ]; then
    read_only=yes
    shift
fi
[ $# -ge 1 ] && [ $# -le 4 ] || usage
uri=$1
offset=${2:-0}
length=${3:-1M}
pattern=${4:-0xa5}
case $uri in
    nbd://* | nbd+unix://* | nbds://* | nbds+unix://*) ;;
    *) echo "${0##*/}: not an NBD URI: $uri" >&2; usage ;;
esac

if ! command -v qemu-io >/dev/null; then
    echo "${0##*/}: qemu-io not found (Debian: apt install qemu-utils)" >&2
    exit 1
fi

# -f raw: the NBD server presents the guest view, whatever the image format
# on the server side.  qemu-io prints "Pattern verification failed" and (in
# older releases) still exits 0, so its output is checked too.
if [ "$read_only" = yes ]; then
    cmds=(-r -c "read -P $pattern $offset $length")
else
    cmds=(-c "write -P $pattern $offset $length" -c "flush" -c "read -P $pattern $offset $length")
fi
status=0
out=$(qemu-io -f raw "${cmds[@]}" "$uri" 2>&1) || status=$?
if [ "$status" -ne 0 ] || grep -qi "verification failed\|error" <<<"$out"; then
    printf '%s\n' "$out" >&2
    echo "${0##*/}: FAILED: pattern $pattern at $offset+$length on $uri" >&2
    exit 1
fi
printf '%s\n' "$out"
echo "${0##*/}: OK: pattern $pattern at $offset+$length on $uri"
