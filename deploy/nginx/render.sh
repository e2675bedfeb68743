#!/bin/sh
# Renders an nginx template of this directory to stdout, substituting only the FANPIPE_*
# variables (nginx's own $variables stay as they are), with the documented defaults.
set -eu
: "${FANPIPE_PROXY_LISTEN:=80}"
: "${FANPIPE_UPSTREAM:=127.0.0.1:8080}"
: "${FANPIPE_PROXY_TIMEOUT:=3610s}"
: "${FANPIPE_PROXY_IDLE_TIMEOUT:=60s}"
: "${FANPIPE_TLS_CERT:=/etc/ssl/certs/fanpipe.pem}"
: "${FANPIPE_TLS_KEY:=/etc/ssl/private/fanpipe.key}"
export FANPIPE_PROXY_LISTEN FANPIPE_UPSTREAM FANPIPE_PROXY_TIMEOUT FANPIPE_PROXY_IDLE_TIMEOUT FANPIPE_TLS_CERT FANPIPE_TLS_KEY
exec envsubst '${FANPIPE_PROXY_LISTEN} ${FANPIPE_UPSTREAM} ${FANPIPE_PROXY_TIMEOUT} ${FANPIPE_PROXY_IDLE_TIMEOUT} ${FANPIPE_TLS_CERT} ${FANPIPE_TLS_KEY}' < "$1"
