"""varlink_call.py SOCKET METHOD JSON: one Varlink call, the reply on stdout.

For the boot tests' non-root caller (varlinkctl from the reference tools lives
below /root, which other users cannot enter); the standard library only.
"""

import json
import socket
import sys

sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
call = {"method": sys.argv[2], "parameters": json.loads(sys.argv[3])}
sock.sendall(json.dumps(call).encode() + b"\0")
buf = b""
while not buf.endswith(b"\0"):
    chunk = sock.recv(65536)
    if not chunk:
        sys.exit("the connection closed before the reply")
    buf += chunk
print(buf[:-1].decode())
