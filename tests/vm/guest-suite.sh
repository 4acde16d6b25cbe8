#!/bin/sh
# Runs inside a kernel-matrix guest (`cargo xtask vm-test`), chrooted into the host's root; the job
# script xtask generates calls it as
#
#   guest-suite.sh <workspace> <name>=<test binary> ... -- <libtest args>
#
# It runs the test binaries one after another from <workspace>/tests (as `cargo test` would),
# prints `SOCKMESH-VM-SUITE <name>: exit <code>` after each, the kernel log's tail when anything
# failed, and exits 0 only when every binary passed. Paths must not contain spaces.
set -u
workspace=$1
shift
bins=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    bins="$bins $1"
    shift
done
[ $# -gt 0 ] && shift

# Autoloading works too (the init points the kernel's modprobe into this tree); loading the
# harness's modules up front makes a missing one fail here, with modprobe's own message.
modprobe -a veth bridge || echo "sockmesh-vm: modprobe veth bridge failed"

cd "$workspace/tests" || exit 125
status=0
for bin in $bins; do
    name=${bin%%=*}
    path=${bin#*=}
    echo "SOCKMESH-VM-SUITE $name: start"
    "$path" "$@"
    rc=$?
    echo "SOCKMESH-VM-SUITE $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
done
if [ "$status" -ne 0 ]; then
    echo "--- guest kernel log (last 40 lines) ---"
    dmesg | tail -n 40
fi
exit "$status"
