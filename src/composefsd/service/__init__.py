"""The Varlink service: the io.composefs.Repository interface, its asyncio transport
(framing, fd passing, validation, socket activation) and the composefsd daemon."""
