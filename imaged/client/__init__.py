"""
imaged-client: upload and download disk images through the images API.

A library and a CLI (`imaged-client`, see imaged.client.cli) that move a
whole image as fast as the server allows: sparse-aware (holes are neither
read nor sent), over several keep-alive connections, over the daemon's unix
socket when it runs on this host, optionally verified with the server's
block checksum. It uses only the documented images API, so it works
against imaged and any server speaking ovirt-imageio's images API.

    from imaged import client
    client.upload("disk.qcow2", url, cafile="ca.pem", verify=True)
    client.download(url, "disk.raw", cafile="ca.pem")
    client.download(url, "inc.qcow2", incremental=True, backing_file="full.qcow2")

    with client.ImageClient(url, cafile="ca.pem") as img:   # random access
        img.read(0, 4096)

Images in other formats than raw go through a local qemu-nbd (see
imaged.client.formats); transient failures are retried (imaged.client.retry).

Importing this package does not start or import the daemon (no gevent).
"""

from .api import DEFAULT_BUFFER_SIZE
from .api import DEFAULT_CONNECTIONS
from .api import DEFAULT_RETRIES
from .api import DEFAULT_RETRY_DELAY
from .api import DEFAULT_TIMEOUT
from .api import Result
from .api import checksum
from .api import download
from .api import download_stream
from .api import info
from .api import upload
from .api import upload_stream
from .api import verify
from .errors import ClientError
from .errors import ConnectionLostError
from .errors import ForbiddenError
from .errors import HTTPError
from .errors import OutOfRangeError
from .errors import TransferTimeout
from .errors import UnsupportedError
from .errors import UsageError
from .errors import VerifyError
from .image import ImageClient
from .images import DirtyExtent
from .images import Extent
from .progress import Progress

__all__ = [
    "upload", "download", "upload_stream", "download_stream", "checksum", "verify",
    "info", "Result", "Progress", "ImageClient", "Extent", "DirtyExtent",
    "ClientError", "ConnectionLostError", "ForbiddenError", "HTTPError",
    "OutOfRangeError", "TransferTimeout", "UnsupportedError", "UsageError",
    "VerifyError", "DEFAULT_BUFFER_SIZE", "DEFAULT_CONNECTIONS", "DEFAULT_TIMEOUT",
    "DEFAULT_RETRIES", "DEFAULT_RETRY_DELAY",
]
