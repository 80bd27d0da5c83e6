#!/usr/bin/python3
"""Interop check with aioice's TURN client (a third-party implementation).

Runs a UDP echo peer on PEER_IP, then against the relay at SERVER: Allocate, CreatePermission,
Send indication -> Data indication round trip, ChannelBind -> ChannelData round trips,
Refresh(0); then a wrong password must get 401. Prints one line per step; exits non-zero on
the first failure.

TRANSPORT is how aioice reaches the relay: udp (the default), tcp, or tls (RFC 8656 §5), which
trusts only the CA certificate in CA_FILE and checks the relay's certificate against
SERVER_IP. The relayed side is UDP either way.

usage: aioice_turn.py SERVER_IP SERVER_PORT USER PASSWORD PEER_IP [udp|tcp|tls [CA_FILE]]
"""
import asyncio
import os
import ssl
import struct
import sys

from aioice import stun
from aioice.turn import TurnClientUdpProtocol, create_turn_endpoint

# aioice's codec lacks DATA (RFC 8656 §18.4), which Send/Data indications carry; register it
# with aioice's own byte packers.
_DATA = (0x0013, "DATA", stun.pack_bytes, stun.unpack_bytes)
stun.ATTRIBUTES_BY_TYPE.setdefault(0x0013, _DATA)
stun.ATTRIBUTES_BY_NAME.setdefault("DATA", _DATA)

TIMEOUT = 5.0
ROUNDS = 50


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Inbox(asyncio.DatagramProtocol):
    """What the TURN transport delivers (ChannelData payloads)."""

    def __init__(self):
        self.queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))


class DataIndications:
    """Wraps the inner protocol's datagram_received to also capture Data indications."""

    def __init__(self, inner):
        self.queue = asyncio.Queue()
        original = inner.datagram_received

        def hook(data, addr):
            if len(data) >= 20 and data[0] >> 6 == 0:
                try:
                    message = stun.parse_message(data)
                except ValueError:
                    message = None
                if (
                    message is not None
                    and message.message_method == stun.Method.DATA
                    and message.message_class == stun.Class.INDICATION
                ):
                    self.queue.put_nowait(
                        (message.attributes["DATA"], message.attributes["XOR-PEER-ADDRESS"])
                    )
                    return
            original(data, addr)

        inner.datagram_received = hook


def step(text):
    print(f"ok: {text}", flush=True)


def endpoint_options(transport, ca_file):
    """create_turn_endpoint's keyword arguments for TRANSPORT."""
    if transport == "udp":
        return {}
    if transport == "tcp":
        return {"transport": "tcp"}
    if transport == "tls":
        context = ssl.create_default_context(cafile=ca_file)
        return {"transport": "tcp", "ssl": context}
    raise SystemExit(f"unknown transport {transport}")


async def main():
    server_ip, server_port, user, password, peer_ip = sys.argv[1:6]
    transport_name = sys.argv[6] if len(sys.argv) > 6 else "udp"
    ca_file = sys.argv[7] if len(sys.argv) > 7 else None
    options = endpoint_options(transport_name, ca_file)
    server = (server_ip, int(server_port))
    loop = asyncio.get_running_loop()

    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(peer_ip, 0))
    peer = echo_transport.get_extra_info("sockname")[:2]

    transport, inbox = await asyncio.wait_for(
        create_turn_endpoint(Inbox, server, user, password, lifetime=600, **options), TIMEOUT
    )
    inner = transport._TurnTransport__inner_protocol
    relayed = inner.relayed_address
    step(f"Allocate over {transport_name}: relayed address {relayed[0]}:{relayed[1]}")
    tls = inner.transport.get_extra_info("ssl_object")
    if tls is not None:
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        step(f"TLS {tls.version()}, relay certificate {subject.get('commonName')}")

    # CreatePermission (RFC 8656 §10), then Send/Data indications (§11).
    request = stun.Message(
        message_method=stun.Method.CREATE_PERMISSION, message_class=stun.Class.REQUEST
    )
    request.attributes["XOR-PEER-ADDRESS"] = peer
    await asyncio.wait_for(inner.request_with_retry(request), TIMEOUT)
    step(f"CreatePermission for {peer[0]}")

    indications = DataIndications(inner)
    payload = os.urandom(300)
    send = stun.Message(message_method=stun.Method.SEND, message_class=stun.Class.INDICATION)
    send.attributes["XOR-PEER-ADDRESS"] = peer
    send.attributes["DATA"] = payload
    inner.send_stun(send, server)
    data, source = await asyncio.wait_for(indications.queue.get(), TIMEOUT)
    assert data == payload, "Data indication payload differs"
    assert tuple(source) == tuple(peer), f"Data indication from {source}, expected {peer}"
    step("Send indication -> Data indication round trip")

    # ChannelBind + ChannelData (§12): aioice binds a channel on first sendto.
    for i in range(ROUNDS):
        payload = struct.pack("!I", i) + os.urandom(100 + i)
        transport.sendto(payload, peer)
        data, source = await asyncio.wait_for(inbox.queue.get(), TIMEOUT)
        assert data == payload, f"ChannelData round {i}: payload differs"
        assert tuple(source) == tuple(peer)
    step(f"ChannelBind + {ROUNDS} ChannelData round trips")

    # Refresh with LIFETIME 0 deletes the allocation (§8).
    request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
    request.attributes["LIFETIME"] = 0
    response, _ = await asyncio.wait_for(inner.request_with_retry(request), TIMEOUT)
    assert response.attributes["LIFETIME"] == 0
    step("Refresh(0) deleted the allocation")
    request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
    request.attributes["LIFETIME"] = 600
    try:
        await asyncio.wait_for(inner.request_with_retry(request), TIMEOUT)
        raise AssertionError("Refresh after delete succeeded")
    except stun.TransactionFailed as e:
        code = e.response.attributes["ERROR-CODE"][0]
        assert code == 437, f"Refresh after delete got {code}, expected 437"
    step("Refresh after delete -> 437")
    transport.close()

    # Wrong password: the signed retry after 401 is rejected with 401 again.
    try:
        await asyncio.wait_for(
            create_turn_endpoint(Inbox, server, user, password + "-wrong", **options), TIMEOUT
        )
        raise AssertionError("Allocate with a wrong password succeeded")
    except stun.TransactionFailed as e:
        code = e.response.attributes["ERROR-CODE"][0]
        assert code == 401, f"wrong password got {code}, expected 401"
    step("wrong password -> 401")
    echo_transport.close()
    print("aioice interop: all steps passed", flush=True)


asyncio.run(main())
