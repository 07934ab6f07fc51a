#!/bin/sh
# memvisor guest agent (busybox sh), on the virtio-console /dev/hvc0 (whole buffers per VM exit), or on the
# second UART /dev/ttyS1 when the guest has no virtio-console. One request per line, answers as lines:
#   -> MVAGENT READY                   once, at start
#   <- RUN <id> <base64 of command>    run it with /bin/sh -c in /, stdin /dev/null, oom_score_adj 0
#   -> <id> O <base64 line>...         its stdout (the file, base64-encoded as busybox wraps it)
#   -> <id> E <base64 line>...         its stderr
#   -> <id> X <exit status>            last (128+N when killed by signal N, e.g. 137 by the OOM killer)
#   <- PING <id>          -> <id> PONG
#   <- POWEROFF           -> the guest powers off (ACPI S5)
#   <- anything else      -> <id or -> ERR unknown
# Ids are host-chosen words of [A-Za-z0-9._:-]; others are refused with ERR unknown. Requests are served one
# at a time, in order (a PING sent during a long RUN is answered after its X). Empty lines are ignored.
PORT=${MVAGENT_PORT:-}
if [ -z "$PORT" ]; then
    # init.sh loaded virtio_console, whose probe makes /dev/hvc0 at once; wait up to 2 s for it all the same.
    modprobe -q virtio_console 2>/dev/null
    tries=0
    while [ ! -c /dev/hvc0 ] && [ "$tries" -lt 20 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    PORT=/dev/ttyS1
    [ -c /dev/hvc0 ] && PORT=/dev/hvc0
fi
set -f
# clocal: open without waiting for a carrier; -hupcl: keep the line up when closed.
make_raw() { stty "$@" raw -echo -echoe -echok -echoctl -echoke -icrnl -onlcr -opost clocal -hupcl; }
make_raw -F "$PORT"
exec 3<>"$PORT"
# Again on the open port: an hvc tty forgets its settings at each last close (TTY_DRIVER_RESET_TERMIOS).
make_raw <&3
cd /

valid_id() {
    case "$1" in
        "" | *[!A-Za-z0-9._:-]*) return 1 ;;
    esac
    return 0
}

run_command() {
    id=$1
    work=$(mktemp -d /tmp/mvagent.XXXXXX) || { echo "$id X 126" >&3; return; }
    printf '%s\n' "$2" | base64 -d > "$work/cmd" 2>/dev/null
    (
        echo 0 > /proc/self/oom_score_adj
        exec /bin/sh -c "$(cat "$work/cmd")"
    ) < /dev/null > "$work/out" 2> "$work/err"
    status=$?
    # Through one pipe: sed writes a tty line by line (one VM exit per line), cat passes on whole blocks.
    { base64 "$work/out" | sed "s/^/$id O /"; base64 "$work/err" | sed "s/^/$id E /"; } | cat >&3
    rm -rf "$work"
    echo "$id X $status" >&3
}

echo "MVAGENT READY" >&3
while IFS= read -r line <&3; do
    line=${line%"$(printf '\r')"}
    # shellcheck disable=SC2086  # split the request into words on purpose (globbing is off)
    set -- $line
    verb=${1:-}
    case "$verb" in
        "") continue ;;
        RUN)
            if [ $# -le 3 ] && valid_id "${2:-}"; then
                run_command "$2" "${3:-}"
            else
                if valid_id "${2:-}"; then echo "$2 ERR unknown" >&3; else echo "- ERR unknown" >&3; fi
            fi ;;
        PING)
            if valid_id "${2:-}"; then echo "$2 PONG" >&3; else echo "- ERR unknown" >&3; fi ;;
        POWEROFF)
            sync
            poweroff -f ;;
        *)
            if valid_id "${2:-}"; then echo "$2 ERR unknown" >&3; else echo "- ERR unknown" >&3; fi ;;
    esac
done
