# Guest script of a lab host VM (`scripts/lab`, tests/src/lab/): runs after /init of
# tests/vm/build-initramfs and never returns.
#
# Kernel command line: lab.host=NAME lab.index=N (1, 2, 3...) [lab.hold=1]
#
# 1. Network: the NIC with MAC 52:54:00:77:0N:01 is the management network
#    (192.168.77.1N/24, control API), 52:54:00:77:0N:02 the replication network
#    (10.77.77.1N/24).
# 2. Disk: the NVMe namespace /dev/nvme0n1 holds VG vg_nvme. First boot creates it: an ext4
#    LV `state` (mounted on /var/lib/tandem-lab: tandemd's state, its log, drill logs) and
#    the thin pool vg_nvme/thin that the `nvme` pool of tandemd uses. Later boots (after a
#    power cut too) activate the VG, let thin_check run, and mount `state` (journal replay).
# 3. tandemd starts with /etc/tandem/NAME.toml (in the image, copied to
#    /etc/tandem/tandem.toml), unless lab.hold=1: the
#    drill then checks this host's disk as the power cut left it before tandemd touches it.
# 4. The agent: commands from the host arrive on the virtio serial port named lab.agent
#    (not a console: no tty echo, no slow hvc path), one per
#    line as `ID BASE64(SCRIPT)`; each runs with sh, and the answer is
#    `@@OUT ID`, the output (stdout+stderr) in base64, `@@RC ID STATUS`.
set -u
arg() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}" ;; esac
    done
}
NAME=$(arg lab.host)
INDEX=$(arg lab.index)
hostname "$NAME"
echo "@@LAB-BOOT $NAME $(cut -d' ' -f1 /proc/uptime)"

nic_by_mac() {
    for dev in /sys/class/net/*; do
        [ "$(cat "$dev/address")" = "$1" ] && basename "$dev"
    done
}
MGMT=$(nic_by_mac "52:54:00:77:0$INDEX:01")
REPL=$(nic_by_mac "52:54:00:77:0$INDEX:02")
ip link set "$MGMT" up
ip addr add "192.168.77.1$INDEX/24" dev "$MGMT"
ip link set "$REPL" up
ip addr add "10.77.77.1$INDEX/24" dev "$REPL"

STATE=/var/lib/tandem-lab
if ! vgs vg_nvme >/dev/null 2>&1; then
    echo "@@LAB-FIRST-BOOT $NAME"
    pvcreate -q /dev/nvme0n1 && vgcreate -q vg_nvme /dev/nvme0n1 &&
        lvcreate -q -L 64M -n state vg_nvme && mkfs.ext4 -q /dev/vg_nvme/state &&
        lvcreate -q -L 600M -T vg_nvme/thin || echo "@@LAB-ERROR first-boot LVM setup failed"
fi
vgchange -q -ay vg_nvme >/dev/null 2>&1 || echo "@@LAB-ERROR vgchange -ay vg_nvme failed"
mkdir -p "$STATE" /run/tandem
mount -t ext4 /dev/vg_nvme/state "$STATE" || echo "@@LAB-ERROR cannot mount the state LV"
mkdir -p "$STATE/tandem" "$STATE/drill"
cp "/etc/tandem/$NAME.toml" /etc/tandem/tandem.toml || echo "@@LAB-ERROR no /etc/tandem/$NAME.toml"
# TEST ONLY (drop-flush, below): the pool keeps its data in this guest's page cache, which
# a power cut loses unless it was flushed. Under the default O_DIRECT a write is on the
# virtual disk once it completes, so dropped flushes would lose only the block mappings
# dm-thin had not committed yet (it commits every second), and the drill's self-test could
# go 20 cycles without a loss to notice. `[[pools]]` is the config's last table.
if grep -qw lab.unsafe_drop_flush=1 /proc/cmdline && grep -q '^\[\[pools\]\]' /etc/tandem/tandem.toml; then
    echo 'cache = "writeback"' >>/etc/tandem/tandem.toml
fi

# `lab-tandemd start|stop|status`: the daemon under the agent's control.
cat >/usr/local/bin/lab-tandemd <<'EOF'
#!/bin/sh
case "$1" in
start)
    [ -f /run/tandemd.pid ] && kill -0 "$(cat /run/tandemd.pid)" 2>/dev/null && exit 0
    rm -f /run/tandem/tandemd.sock
    # TEST ONLY (`scripts/lab up --test-unsafe-drop-flush`): tandemd drops volume flushes.
    grep -qw lab.unsafe_drop_flush=1 /proc/cmdline && export TANDEM_TEST_UNSAFE_DROP_FLUSH=1
    setsid tandemd --config /etc/tandem/tandem.toml >>/var/lib/tandem-lab/tandemd.log 2>&1 </dev/null &
    echo $! >/run/tandemd.pid
    i=0
    while [ ! -S /run/tandem/tandemd.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    [ -S /run/tandem/tandemd.sock ] || { echo "tandemd did not start"; tail -n 20 /var/lib/tandem-lab/tandemd.log; exit 1; } ;;
stop)
    [ -f /run/tandemd.pid ] && kill "$(cat /run/tandemd.pid)" 2>/dev/null; rm -f /run/tandemd.pid ;;
status)
    [ -f /run/tandemd.pid ] && kill -0 "$(cat /run/tandemd.pid)" 2>/dev/null ;;
esac
EOF
chmod 755 /usr/local/bin/lab-tandemd
[ "$(arg lab.hold)" = 1 ] || lab-tandemd start
echo "@@LAB-READY $NAME $(cut -d' ' -f1 /proc/uptime)"

AGENT=
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name" 2>/dev/null)" = lab.agent ] && AGENT=/dev/$(basename "$port")
done
[ -n "$AGENT" ] || echo "@@LAB-ERROR no virtio port lab.agent"
while true; do
    # One read-write descriptor: a virtio port can be open only once at a time.
    exec 3<>"$AGENT"
    while read -r id script <&3; do
        echo "$script" | base64 -d >/tmp/agent.sh 2>/dev/null
        sh /tmp/agent.sh >/tmp/agent.out 2>&1 </dev/null 3>&-
        rc=$?
        # Built in a file first: cat then writes large chunks (a write per base64 line
        # costs a VM exit each under TCG).
        { echo "@@OUT $id"; base64 /tmp/agent.out; echo "@@RC $id $rc"; } >/tmp/agent.answer
        cat /tmp/agent.answer >&3
    done
    exec 3<&-
    sleep 0.2
done
