"""nbdqcow: a pure-Python asyncio NBD server for qcow2 and raw disk images.

The package is layered so that each layer can be read and tested alone:

* ``nbdqcow.nbd`` -- the sans-I/O NBD protocol core (bytes in, events out);
* ``nbdqcow.backends`` -- the block-backend interface and the raw backend;
* ``nbdqcow.qcow2`` -- the qcow2 engine, split by concern like qemu's
  ``block/qcow2*.c``;
* ``nbdqcow.server`` -- the thin asyncio adapter that joins the two;
* ``nbdqcow.cli`` -- the ``nbdqcow`` command.
"""

__version__ = "0.1.0"
