#!/bin/sh
# /init of the real-Xen lab's dom0 (busybox sh; run-xen-lab.sh builds the
# image). Its console is hvc0 -> Xen's console -> com1 -> QEMU's stdout, where
# run-xen-lab.sh reads these lines:
#   XENSOCK-LAB <event> t=<dom0 uptime>     progress and timings
#   XENSOCK-CHECK PASS <name> (details)     one per check
#   XENSOCK-CHECK FAIL <name>: why
#   XENSOCK-LAB DONE failed=<n>             the end; then dom0 powers off
# Guest consoles (logged by xenconsoled) and xensockd's log are streamed here
# with a [lab-a] / [lab-b] / [xensockd] prefix.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export HOME=/root
. /lab/config

FAILED=0
up() { read -r u _ </proc/uptime; echo "$u"; }
mark() { echo "XENSOCK-LAB $* t=$(up)"; }
pass() { n=$1; shift; echo "XENSOCK-CHECK PASS $n ($*)"; }
fail() { n=$1; shift; echo "XENSOCK-CHECK FAIL $n: $*"; FAILED=$((FAILED + 1)); }
# Seconds since $1 (an uptime), two decimals.
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }'; }
# prefix TAG: copy stdin to the console, each line prefixed.
prefix() { while IFS= read -r line; do echo "[$1] $line"; done; }
# follow FILE TAG: stream a (maybe not yet existing) log file to the console.
follow() { tail -n +1 -F "$1" 2>/dev/null | prefix "$2" & }
# wait_line FILE PATTERN SECONDS: until grep -E finds PATTERN in FILE.
wait_line() {
    n=0
    while [ "$n" -lt $(($3 * 10)) ]; do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
        n=$((n + 1))
    done
    return 1
}
finish() {
    sleep 1  # let the followers print what they have
    mark "DONE failed=$FAILED"
    sync
    poweroff -f
    sleep 10
}
trap finish EXIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mark dom0-init
echo 4 >/proc/sys/kernel/printk

# --- Xen's device drivers (modules in Debian's kernel) ----------------------
ok=1
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc; do
    insmod "/lib/modules/lab/$m.ko" || { ok=0; fail dom0/modules "insmod $m.ko failed"; }
done
mount -t xenfs xenfs /proc/xen || { ok=0; fail dom0/modules "mount xenfs failed"; }
n=0
while [ "$n" -lt 50 ]; do
    [ -c /dev/xen/gntdev ] && [ -c /dev/xen/evtchn ] && [ -c /dev/xen/privcmd ] && [ -c /dev/xen/xenbus ] && break
    sleep 0.1
    n=$((n + 1))
done
missing=
for d in privcmd evtchn gntdev gntalloc xenbus xenbus_backend; do [ -c /dev/xen/$d ] || missing="$missing $d"; done
if [ -n "$missing" ]; then ok=0; fail dom0/modules "missing /dev/xen/:$missing"; fi
[ "$ok" = 1 ] && pass dom0/modules "xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc; /dev/xen: $(ls /dev/xen | tr '\n' ' ' | sed 's/ $//')"
ifconfig lo 127.0.0.1 up

# --- toolstack: xenstored, xen-init-dom0, xenconsoled -----------------------
mkdir -p /var/run/xenstored /var/lib/xenstored /var/log/xen/console /var/lib/xen /var/run/xen /var/lock \
    /run/xensock /run/lab
t=$(up)
xenstored --pid-file=/var/run/xenstored.pid
n=0
until xenstore-exists / 2>/dev/null; do
    n=$((n + 1))
    [ "$n" -gt 100 ] && break
    sleep 0.1
done
xen-init-dom0 >/tmp/xen-init-dom0.log 2>&1
rc_init=$?
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
rc_cons=$?
if xenstore-exists / && [ "$rc_init" = 0 ] && [ "$rc_cons" = 0 ]; then
    pass dom0/toolstack "xenstored, xen-init-dom0, xenconsoled up in $(since "$t") s; dom0 name $(xenstore-read /local/domain/0/name)"
else
    fail dom0/toolstack "xenstored up: $(xenstore-exists / && echo yes || echo no); xen-init-dom0 rc $rc_init: $(tail -3 /tmp/xen-init-dom0.log); xenconsoled rc $rc_cons"
    exit 1
fi
mark toolstack-ready

# --- xensockd on the real platform ------------------------------------------
t=$(up)
# Two workers: the guests (domids 1 and 2) are served by different threads,
# each with its own gnttab and evtchn handles. Ring order up to 9 (guest B
# uses 9: 512 pages, 1 MiB each way; guest A the library's default, 6).
xensockd --workers 2 --max-ring-order 9 --log-level "$XENSOCKD_LOG_LEVEL" --pid-file /run/xensock/xensockd.pid >/var/log/xensockd.log 2>&1 &
XSPID=$!
follow /var/log/xensockd.log xensockd
n=0
while [ ! -s /run/xensock/xensockd.pid ] && kill -0 "$XSPID" 2>/dev/null && [ "$n" -lt 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
if [ -s /run/xensock/xensockd.pid ] && kill -0 "$XSPID" 2>/dev/null; then
    pass dom0/xensockd "serving on the real platform (pid $XSPID) after $(since "$t") s"
else
    wait "$XSPID" 2>/dev/null
    fail dom0/xensockd "xensockd did not start (exit code $?): $(tail -5 /var/log/xensockd.log)"
    exit 1
fi
mark xensockd-ready

# --- dom0's services for the guests' data checks ----------------------------
# An echo service serves until power-off: if one ends, that is a failure of
# the lab itself, said with its exit status (a crash shows as 128+signal).
echo_service() {
    xen-lab-peer echo "$@" 2>&1
    echo "XENSOCK-CHECK FAIL dom0/echo-$1: the echo service exited with status $?"
}
echo_service A "$ECHO_PORT_A" "$BYTES" /run/lab &
echo_service B "$ECHO_PORT_B" "$BYTES" /run/lab &
# The sessions the guests hold while they are destroyed.
echo_service A-hold "$HOLD_PORT_A" 0 /run/lab &
echo_service B-hold "$HOLD_PORT_B" 0 /run/lab &

# --- the guests --------------------------------------------------------------
# guest_cfg NAME LABEL ECHO_PORT LISTEN_PORT HOLD_PORT RING_ORDER DEVICE_LINE
guest_cfg() {
    cat >"/lab/$1.cfg" <<EOF
name = "$1"
type = "pv"
kernel = "/lab/vmlinuz"
ramdisk = "/lab/guest.cpio"
cmdline = "console=hvc0 rdinit=/init loglevel=4 lab_label=$2 lab_echo=$3 lab_listen=$4 lab_hold=$5 lab_order=$6 lab_bytes=$BYTES lab_accept_bytes=$ACCEPT_BYTES"
memory = $GUEST_MEM
vcpus = 1
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
$7
EOF
}
guest_cfg lab-a A "$ECHO_PORT_A" "$LISTEN_PORT_A" "$HOLD_PORT_A" 0 "pvcalls = [ 'backend=0' ]"
guest_cfg lab-b B "$ECHO_PORT_B" "$LISTEN_PORT_B" "$HOLD_PORT_B" 9 ""

# The domid of a domain `xl create` just made. Retried: on a loaded machine
# `xl domid` right after `xl create` has been seen to print nothing although
# the domain exists and boots.
domid_of() {
    n=0
    while [ "$n" -lt 50 ]; do
        id=$(xl domid "$1" 2>/dev/null) && [ -n "$id" ] && { echo "$id"; return 0; }
        sleep 0.2
        n=$((n + 1))
    done
    return 1
}

# Guest A: xl writes the pvcalls nodes (pvcalls = [ 'backend=0' ]).
t=$(up)
xl create /lab/lab-a.cfg >/tmp/xl-create-a.log 2>&1
rc=$?
DOMA=$(domid_of lab-a)
if [ "$rc" = 0 ] && [ -n "$DOMA" ]; then
    be=/local/domain/0/backend/pvcalls/$DOMA/0
    if xenstore-exists "$be/state" && xenstore-exists "/local/domain/$DOMA/device/pvcalls/0/backend"; then
        pass A/xl-create "domid $DOMA in $(since "$t") s; xl wrote $be and /local/domain/$DOMA/device/pvcalls/0"
    else
        fail A/xl-create "domid $DOMA created but xl wrote no pvcalls device nodes: $(xenstore-ls -f /local/domain/0/backend 2>&1 | head -5)"
    fi
else
    fail A/xl-create "xl create exit code $rc, domid '${DOMA}': $(tail -5 /tmp/xl-create-a.log)"
fi
# The nodes Linux's pvcalls-front reads when it probes: xensockd must write
# them as soon as xl has made the backend directory (bounded wait: xensockd
# sees the directory through a watch).
if [ -n "$DOMA" ]; then
    be=/local/domain/0/backend/pvcalls/$DOMA/0
    t=$(up)
    n=0
    while :; do
        v=$(xenstore-read "$be/versions" 2>/dev/null)
        o=$(xenstore-read "$be/max-page-order" 2>/dev/null)
        f=$(xenstore-read "$be/function-calls" 2>/dev/null)
        [ -n "$v" ] && [ -n "$o" ] && [ -n "$f" ] && break
        [ "$n" -ge 100 ] && break
        sleep 0.1
        n=$((n + 1))
    done
    case "$o" in
        '' | *[!0-9]*) o_ok=0 ;;
        *) if [ "$o" -ge 4 ]; then o_ok=1; else o_ok=0; fi ;;
    esac
    if [ "$v" = 1 ] && [ "$o_ok" = 1 ] && [ "$f" = 1 ]; then
        pass A/backend-nodes "versions=$v max-page-order=$o function-calls=$f in $be, $(since "$t") s after xl create"
    else
        fail A/backend-nodes "in $be after $(since "$t") s: versions='$v' (want 1), max-page-order='$o' (want >= 4), function-calls='$f' (want 1)"
    fi
fi
mark created-A
follow /var/log/xen/console/guest-lab-a.log lab-a

# Guest B: no device from xl; xensockctl attach plays the toolstack.
t=$(up)
xl create /lab/lab-b.cfg >/tmp/xl-create-b.log 2>&1
rc=$?
DOMB=$(domid_of lab-b)
if [ "$rc" = 0 ] && [ -n "$DOMB" ]; then
    pass B/xl-create "domid $DOMB in $(since "$t") s"
    t=$(up)
    if out=$(xensockctl attach --domid "$DOMB" --protocol xensock 2>&1); then
        pass B/xensockctl-attach "$out in $(since "$t") s"
    else
        fail B/xensockctl-attach "$out"
    fi
else
    fail B/xl-create "xl create exit code $rc, domid '${DOMB}': $(tail -5 /tmp/xl-create-b.log)"
fi
mark created-B
follow /var/log/xen/console/guest-lab-b.log lab-b

# dom0 clients for the guests' listening sockets (bound in dom0 by xensockd).
[ -n "$DOMA" ] && { xen-lab-peer client A "$LISTEN_PORT_A" "$ACCEPT_BYTES" "$GUEST_TIMEOUT" & CLA=$!; }
[ -n "$DOMB" ] && { xen-lab-peer client B "$LISTEN_PORT_B" "$ACCEPT_BYTES" "$GUEST_TIMEOUT" & CLB=$!; }

# --- wait for both guests to finish their checks -----------------------------
t_wait=$(up)
for g in A B; do
    left=$(awk -v a="$t_wait" -v b="$(up)" -v t="$GUEST_TIMEOUT" 'BEGIN { l = int(t - (b - a)); print (l > 1 ? l : 1) }')
    if [ "$g" = A ]; then dom=$DOMA; log=/var/log/xen/console/guest-lab-a.log; else dom=$DOMB; log=/var/log/xen/console/guest-lab-b.log; fi
    [ -n "$dom" ] || continue
    if wait_line "$log" "XENSOCK-GUEST $g END" "$left"; then
        mark "guest-$g-end"
        line=$(grep -E "XENSOCK-GUEST $g END" "$log" | tail -1 | tr -d '\r')
        case "$line" in
            *"END $g failed=0"*) pass "$g/guest-finished" "$line" ;;
            *) fail "$g/guest-finished" "$line" ;;
        esac
    else
        fail "$g/guest-finished" "no END line from guest $g within $GUEST_TIMEOUT s; its console ends with: $(tail -3 "$log" 2>/dev/null | tr -d '\r' | tr '\n' '|')"
    fi
done
[ -n "$CLA" ] && wait "$CLA"
[ -n "$CLB" ] && wait "$CLB"
echo "[xensockctl] $(xensockctl list 2>&1 | tr '\n' '|')"

# --- xl destroy: xensockd must tear the sessions down and write Closed -------
if [ -n "$DOMA" ]; then
    be=/local/domain/0/backend/pvcalls/$DOMA/0
    t=$(up)
    xl -vvv destroy lab-a >/tmp/xl-destroy-a.log 2>&1
    rc=$?
    dt=$(since "$t")
    mark destroyed-A
    if grep -q "unable to remove device" /tmp/xl-destroy-a.log; then
        fail A/xl-destroy "exit code $rc after $dt s; libxl: $(grep "unable to remove device" /tmp/xl-destroy-a.log | head -1)"
    elif [ "$rc" != 0 ]; then
        fail A/xl-destroy "exit code $rc after $dt s: $(tail -3 /tmp/xl-destroy-a.log)"
    else
        pass A/xl-destroy "libxl removed the pvcalls device in $dt s, no 'unable to remove device'"
    fi
    if grep -qE "backend $be/state wanted state 6 ok" /tmp/xl-destroy-a.log; then
        pass A/backend-closed "libxl: $(grep -E "backend $be/state wanted state 6 ok" /tmp/xl-destroy-a.log | head -1 | sed 's/.*: backend/backend/')"
    else
        fail A/backend-closed "libxl never saw $be/state = 6: $(grep -E "$be" /tmp/xl-destroy-a.log | tail -3 | tr '\n' '|')"
    fi
    if xenstore-exists "$be"; then
        fail A/backend-removed "$be still exists after xl destroy"
    else
        pass A/backend-removed "$be removed by libxl"
    fi
    if wait_line /run/lab/A-hold-conn1.closed . 10 || [ -e /run/lab/A-hold-conn1.closed ]; then
        pass A/host-socket-closed "the held connection's dom0 socket was closed after the destroy"
    else
        fail A/host-socket-closed "guest A's held connection to 127.0.0.1:$HOLD_PORT_A is still open 10 s after the destroy"
    fi
fi
if [ -n "$DOMB" ]; then
    be=/local/domain/0/backend/xensock/$DOMB/0
    t=$(up)
    xl -vvv destroy lab-b >/tmp/xl-destroy-b.log 2>&1
    rc=$?
    dt=$(since "$t")
    mark destroyed-B
    if grep -q "unable to remove device" /tmp/xl-destroy-b.log; then
        fail B/xl-destroy "exit code $rc after $dt s; libxl: $(grep "unable to remove device" /tmp/xl-destroy-b.log | head -1)"
    elif [ "$rc" != 0 ]; then
        fail B/xl-destroy "exit code $rc after $dt s: $(tail -3 /tmp/xl-destroy-b.log)"
    else
        pass B/xl-destroy "in $dt s, no 'unable to remove device'"
    fi
    # libxl knows nothing of xensock: the frontend directory vanished with
    # the domain, and xensockd must answer with Closed on its own.
    n=0
    while [ "$(xenstore-read "$be/state" 2>/dev/null)" != 6 ] && [ "$n" -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    st=$(xenstore-read "$be/state" 2>/dev/null)
    if [ "$st" = 6 ]; then
        pass B/backend-closed "$be/state = 6 within $(since "$t") s of the destroy"
    else
        fail B/backend-closed "$be/state is '${st:-missing}' 10 s after the destroy"
    fi
    if wait_line /run/lab/B-hold-conn1.closed . 10 || [ -e /run/lab/B-hold-conn1.closed ]; then
        pass B/host-socket-closed "the held connection's dom0 socket was closed after the destroy"
    else
        fail B/host-socket-closed "guest B's held connection to 127.0.0.1:$HOLD_PORT_B is still open 10 s after the destroy"
    fi
    t=$(up)
    if out=$(xensockctl detach --domid "$DOMB" --protocol xensock --wait 10 2>&1) && ! xenstore-exists "$be"; then
        pass B/xensockctl-detach "$out in $(since "$t") s"
    else
        fail B/xensockctl-detach "$out (after $(since "$t") s)"
    fi
fi

# --- xensockd holds nothing, and stops cleanly -------------------------------
out=$(xensockctl list 2>&1)
case "$out" in
    "no guest sessions"*) pass dom0/no-sessions-left "xensockctl list: $out" ;;
    *) fail dom0/no-sessions-left "xensockctl list: $(echo "$out" | tr '\n' '|')" ;;
esac
t=$(up)
kill -TERM "$XSPID"
wait "$XSPID"
rc=$?
if [ "$rc" = 0 ]; then
    pass dom0/xensockd-stop "exit code 0 on SIGTERM after $(since "$t") s"
else
    fail dom0/xensockd-stop "exit code $rc on SIGTERM"
fi
exit 0
