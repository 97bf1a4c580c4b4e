"""Embed the nbdqcow server in another asyncio program.

    python examples/embed_server.py IMAGE SOCKET

serves IMAGE (raw or qcow2, writable) as export "disk" on the Unix socket
SOCKET, next to the host program's own work (here: a once-a-second report of
how many clients are connected), until Ctrl-C or SIGTERM.  Try it with
``nbdinfo 'nbd+unix:///disk?socket=SOCKET'``.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from nbdqcow.exports import ExportCatalog
from nbdqcow.server import NbdServer, ServerOptions, open_image


async def report(server: NbdServer) -> None:
    """Stands for whatever else the host program does."""
    while True:
        await asyncio.sleep(1)
        logging.info("%d client(s) connected", server.connection_count)


async def main(image: str, socket_path: str) -> None:
    async with ExportCatalog() as catalog:
        catalog.add("disk", await open_image(image, read_only=False),
                    description="embedded example")
        server = NbdServer(catalog, ServerOptions(max_in_flight=32))
        await server.listen_unix(socket_path)
        server.install_signal_handlers()
        reporter = asyncio.create_task(report(server))
        try:
            await server.serve_forever()  # returns after a clean shutdown
        finally:
            reporter.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
