#!/bin/sh
# A certificate authority for a test set-up of DICOM TLS: DIR/ca.pem and DIR/ca.key.
# Usage: make-ca.sh DIR [NAME]
# In production use the hospital's own CA; keep ca.key off the node.
set -eu
dir=${1:?usage: make-ca.sh DIR [NAME]}
name=${2:-pacsnode test CA}
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey rsa:3072 -sha256 -days 825 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" -subj "/O=pacsnode test/CN=$name" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
echo "$dir/ca.pem"
