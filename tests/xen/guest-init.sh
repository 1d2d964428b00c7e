#!/bin/sh
# /init of the real-Xen lab's PV guests (busybox sh). Its console is logged by
# xenconsoled in dom0, which streams it to the serial line. The lab_*
# variables come from the kernel command line (dom0-init.sh's guest_cfg).
# shellcheck disable=SC2154 # lab_* are set by the kernel from its command line
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
read -r u _ </proc/uptime
echo "XENSOCK-GUEST $lab_label init t=$u"
for m in xen-evtchn xen-gntdev xen-gntalloc; do
    insmod "/lib/modules/lab/$m.ko" || echo "XENSOCK-CHECK FAIL $lab_label/modules: insmod $m.ko failed"
done
n=0
while { [ ! -c /dev/xen/evtchn ] || [ ! -c /dev/xen/gntalloc ] || [ ! -c /dev/xen/xenbus ]; } && [ "$n" -lt 50 ]; do
    sleep 0.1
    n=$((n + 1))
done
xen-guest-test --label "$lab_label" --echo-port "$lab_echo" --listen-port "$lab_listen" \
    --bytes "$lab_bytes" --accept-bytes "$lab_accept_bytes" --ring-order "$lab_order" --hold-port "$lab_hold"
echo "XENSOCK-GUEST $lab_label END exit=$? (xen-guest-test returned)"
while true; do sleep 3600; done
