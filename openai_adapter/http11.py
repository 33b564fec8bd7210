"""uvicorn's HTTP/1.1 protocol (h11), whose own 400 carries the OpenAI error body.

A request that is not valid HTTP (a malformed request line, an oversized or broken
header, bad chunked encoding, two Content-Lengths) never reaches the app: uvicorn
answers it itself, in plain text. Here it gets the body every other error has.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

BODY = json.dumps({"error": {
    "message": "the request is not valid HTTP/1.1 (request line, headers or chunked body); the connection is closed",
    "type": "invalid_request_error", "param": None, "code": "invalid_http_request"}}).encode()


class OpenAIH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                             reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=BODY)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass  # a response had started already: all that is left is to close
        self.transport.close()
