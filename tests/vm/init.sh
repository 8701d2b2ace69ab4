#!/bin/sh
# /init of the vmsync VM test bed (busybox ash). Copied into the initramfs by
# build-initramfs.sh. Loads modules, mounts the host root (9p, read-only) on
# /host, gives it writable tmpfs and kernel file systems, chroots into it and
# runs <repo>/tests/vm/guest-run.sh <job file>, then powers off.
#
# Kernel command line: vmtest_repo=DIR vmtest_job=FILE [vmtest_shell=1]
export PATH=/bin:/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1

off() {
  sync
  poweroff -f
  echo o > /proc/sysrq-trigger
  sleep 30
}
fatal() {
  echo "VMTEST FATAL init: $*"
  off
}

echo "VMTEST INIT kernel $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m.ko" || echo "VMTEST INIT insmod $m failed"
done

REPO=""; JOB=""; SHELL_AFTER=0
for w in $(cat /proc/cmdline); do
  case "$w" in
    vmtest_repo=*) REPO=${w#*=} ;;
    vmtest_job=*) JOB=${w#*=} ;;
    vmtest_shell=*) SHELL_AFTER=${w#*=} ;;
  esac
done
[ -n "$REPO" ] || fatal "no vmtest_repo= on the kernel command line"

mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host \
  || mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /host \
  || fatal "cannot mount the host root over 9p"
# The checkout may live under a directory that gets a tmpfs below (CI clones
# into temporary directories): keep a handle on it first, and put it back on
# top of the tmpfs afterwards.
mkdir -p /keep-repo
mount -o bind "/host$REPO" /keep-repo || fatal "cannot bind the repository $REPO"
for d in tmp run var/tmp dev/shm; do
  mount -t tmpfs -o mode=1777 tmpfs "/host/$d" || echo "VMTEST INIT cannot mount tmpfs on /host/$d"
done
chmod 755 /host/run
if [ ! -e "/host$REPO/tests/vm/guest-run.sh" ]; then
  mkdir -p "/host$REPO" && mount -o bind /keep-repo "/host$REPO" \
    || fatal "cannot bind the repository back at $REPO"
fi
mount -t proc proc /host/proc || fatal "mount /host/proc"
mount -t sysfs sysfs /host/sys || fatal "mount /host/sys"
mount -t devtmpfs devtmpfs /host/dev || fatal "mount /host/dev"
mkdir -p /host/dev/pts /host/dev/shm
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
ip link set lo up 2>/dev/null
hostname vmtest

G="$REPO/tests/vm/guest-run.sh"
[ -f "/host$G" ] || fatal "/host$G not found"
echo "VMTEST INIT chroot at $(cut -d' ' -f1 /proc/uptime)s"
ENVV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8 LC_ALL=C.UTF-8"
chroot /host /usr/bin/env -i $ENVV /bin/bash "$G" "$JOB"
echo "VMTEST INIT guest-run exited rc=$?"
if [ "$SHELL_AFTER" = 1 ]; then
  echo "VMTEST INIT interactive shell in the chroot; 'exit' powers off"
  chroot /host /usr/bin/env -i $ENVV REPO="$REPO" PS1='vmtest# ' /bin/bash -i
fi
off
