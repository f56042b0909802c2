#!/bin/sh
# A certificate signed by DIR/ca.pem: DIR/NAME.pem and DIR/NAME.key (unencrypted, 0600).
# Usage: make-cert.sh DIR NAME [SAN...]   SAN: DNS:pacs.example or IP:10.0.0.5
# The peer checks its host name or IP address against the SANs: list every name and
# address this certificate's owner is reached by (default: DNS:localhost, IP:127.0.0.1).
set -eu
dir=${1:?usage: make-cert.sh DIR NAME [SAN...]}
name=${2:?usage: make-cert.sh DIR NAME [SAN...]}
shift 2
if [ $# -eq 0 ]; then set -- DNS:localhost IP:127.0.0.1; fi
sans=$(printf '%s,' "$@"); sans=${sans%,}
umask 077
openssl req -newkey rsa:2048 -sha256 -nodes -keyout "$dir/$name.key" \
    -out "$dir/$name.csr" -subj "/O=pacsnode test/CN=$name" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$sans" > "$dir/$name.ext"
openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 397 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
rm -f "$dir/$name.csr" "$dir/$name.ext"
echo "$dir/$name.pem"
