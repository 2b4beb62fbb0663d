#!/bin/busybox sh
# PID 1 of a `cargo xtask kernels` guest (the initramfs is built by xtask/src/kernels.rs).
#
# Runs `vigie check`, then a capture smoke test: nginx (the host's binary) serves static files
# on loopback, `vigie run` watches its port, curl makes requests with distinct bearer tokens
# and reports what it sent and received, and the final /metrics is dumped. Every fact goes, one
# line each, to the second serial port (/dev/ttyS1), which the host reads and compares; the
# console (ttyS0) gets the human-readable story. The guest only reports: all comparing is done
# on the host.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Not tracefs: vigie mounts it itself when it is missing, and that is part of what is tested.

. /etc/vigie-kernels/params

exec 3>/dev/ttyS1
out() { echo "$*" >&3; }
stage() {
    out "stage $1 $(cut -d' ' -f1 /proc/uptime)"
    echo "==> [guest $(cut -d' ' -f1 /proc/uptime)s] $1"
}
block() { # block NAME FILE: a file's lines, prefixed, between begin/end markers
    out "begin $1"
    sed 's/^/| /' "$2" >&3
    out "end $1"
}
finish() {
    stage done
    out "end-of-report"
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 5
}

stage init
out "uname $(uname -r)"
out "btf $([ -e /sys/kernel/btf/vmlinux ] && echo yes || echo no)"

ip link set lo up || out "error ip link set lo up failed"

# --- nginx on loopback -------------------------------------------------------------------
mkdir -p /tmp/nginx /srv/www/_matrix/client/v3 /srv/www/_matrix/client/v1/media/download/x
printf '%s\n' '{"next_batch":"s72594_4483_1934","rooms":{"join":{}},"presence":{"events":[]},"account_data":{"events":[]}}' \
    > /srv/www/_matrix/client/v3/sync
head -c "$BIG_BYTES" /dev/urandom > /srv/www/_matrix/client/v1/media/download/x/big
nginx -c /etc/vigie-kernels/nginx.conf -e /tmp/nginx/error.log &
n=0
until curl -s -o /dev/null "http://127.0.0.1:$PORT/_matrix/client/v3/sync"; do
    n=$((n + 1))
    if [ $n -ge 100 ]; then
        out "error nginx did not answer on 127.0.0.1:$PORT within 20 s"
        [ -f /tmp/nginx/error.log ] && block nginx_error /tmp/nginx/error.log
        finish
    fi
    sleep 0.2
done
out "nginx up"

# --- vigie check -------------------------------------------------------------------------
stage check
vigie check --server-port "$PORT" $SOURCE_ARGS > /tmp/check.txt 2>&1
rc=$?
cat /tmp/check.txt
block check /tmp/check.txt
out "check_rc $rc"
if [ -d /sys/kernel/tracing/events ]; then
    for tp in sock/sock_send_length sock/sock_recv_length sock/inet_sock_set_state tcp/tcp_destroy_sock \
              syscalls/sys_enter_sendto syscalls/sys_enter_recvfrom syscalls/sys_enter_writev syscalls/sys_enter_sendfile64; do
        out "tracepoint $tp $([ -d /sys/kernel/tracing/events/$tp ] && echo present || echo absent)"
    done
    # Field layouts of what vigie reads at fixed offsets, to compare across kernels.
    for tp in sock/sock_send_length sock/sock_recv_length sock/inet_sock_set_state \
              syscalls/sys_enter_recvfrom syscalls/sys_enter_sendto syscalls/sys_exit_recvfrom; do
        f=/sys/kernel/tracing/events/$tp/format
        [ -f $f ] || continue
        grep 'field:' $f | sed 's/^[[:space:]]*//' > /tmp/format.txt
        block "format:$tp" /tmp/format.txt
    done
fi

# --- vigie run ---------------------------------------------------------------------------
stage run
head -c 32 /dev/urandom > /tmp/key
chmod 600 /tmp/key
vigie run --server-port "$PORT" $SOURCE_ARGS --metrics-addr "$METRICS" --key-file /tmp/key > /tmp/vigie.out 2> /tmp/vigie.err &
vpid=$!
n=0
ready=no
while [ $n -lt $((READY_TIMEOUT * 5)) ]; do
    if ! kill -0 $vpid 2>/dev/null; then
        wait $vpid
        out "run_exited $?"
        break
    fi
    attached=$(curl -s "http://$METRICS/metrics" | awk '/^vigie_probes_attached/ { s += $NF } END { print s + 0 }')
    if [ "$attached" -gt 0 ] 2>/dev/null; then
        ready=yes
        break
    fi
    n=$((n + 1))
    sleep 0.2
done
if [ $ready != yes ]; then
    out "run_ready no"
    block vigie_stderr /tmp/vigie.err
    tail -n 40 /tmp/vigie.err
    finish
fi
out "run_ready yes"

# --- traffic -----------------------------------------------------------------------------
stage traffic
i=0
while read -r tok; do
    rounds=$((i + 1))
    urls=""
    r=0
    while [ $r -lt $rounds ]; do
        urls="$urls /_matrix/client/v3/sync /_matrix/client/v1/media/download/x/big"
        r=$((r + 1))
    done
    if [ $((i % 2)) -eq 1 ]; then
        urls="$urls /_matrix/client/v3/no_such_endpoint"   # a 404 counts as a request too
    fi
    fmt="client $i %{http_code} %{size_request} %{size_header} %{size_download} %{num_connects}\n"
    if [ $i -eq 0 ]; then
        # one connection per request
        for u in $urls; do
            curl -s -o /dev/null -H "Authorization: Bearer $tok" -w "$fmt" "http://127.0.0.1:$PORT$u" >&3
        done
    else
        # every request of this token on one keep-alive connection
        set --
        for u in $urls; do set -- "$@" -o /dev/null "http://127.0.0.1:$PORT$u"; done
        curl -s -H "Authorization: Bearer $tok" -w "$fmt" "$@" >&3
    fi
    i=$((i + 1))
done < /etc/vigie-kernels/tokens
out "tokens $i"
vigie token-hash --key-file /tmp/key < /etc/vigie-kernels/tokens > /tmp/labels.txt 2> /tmp/labels.err
out "token_hash_rc $?"
block labels /tmp/labels.txt

# --- metrics, once they stop changing ------------------------------------------------------
stage scrape
prev=""
same=0
n=0
while [ $n -lt "$SETTLE_SCRAPES" ]; do
    curl -s "http://$METRICS/metrics" > /tmp/metrics.txt
    cur=$(grep -E '^vigie_token_(requests|response_bytes)_total' /tmp/metrics.txt)
    if [ -n "$cur" ] && [ "$cur" = "$prev" ]; then
        same=$((same + 1))
        [ $same -ge 2 ] && break
    else
        same=0
    fi
    prev="$cur"
    n=$((n + 1))
    sleep 1
done
out "scrapes $((n + 1))"
block metrics /tmp/metrics.txt
kill -TERM $vpid
wait $vpid
out "vigie_exit $?"
block vigie_stderr /tmp/vigie.err
grep -ciE 'warn|error' /tmp/vigie.err | sed 's/^/vigie_stderr_warnings /' >&3
finish
