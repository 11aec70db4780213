"""
`images.allowed_dirs`: where session images may be.

An image is allowed when, after resolving every symlink, it is inside one
of the allowed directories; or when it is a block device reached through a
symlink that itself lives in one. The second rule is how oVirt's host agent
lays out block storage:

    /rhev/data-center/mnt/blockSD/SD/images/IMAGE/VOLUME -> /dev/SD/VOLUME
    /dev/SD/VOLUME -> ../dm-7

The volume's device is outside /rhev, but the host agent made the link in
/rhev on purpose. Anything else outside (a regular file, a character device
such as /dev/mem, a directory) stays refused, whatever links lead there.

The rules are checked twice: on the name when a session is added (so the
host agent hears at once, with a 403), and on the file actually opened,
by its descriptor, so that no link changed between the two can lead
elsewhere.
"""

import os
import stat

from . import errors


def _inside(path, dirs):
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _linked_device(path, dirs):
    """
    The (st_rdev) of the block device `path` leads to, if `path` is a
    symlink in one of `dirs` to a block device; else None.
    """
    # The link's own directory, resolved: "..", or a directory symlink
    # leading out of the allowed directories, does not count as inside.
    parent = os.path.realpath(os.path.dirname(path))
    if not _inside(parent, dirs) or not os.path.islink(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def check_path(path, dirs):
    """
    Raise Forbidden unless the image at `path` is allowed in `dirs`
    (resolved absolute directories). Blocks on the file system: call it
    from a pool thread.
    """
    if not dirs:
        return
    if _inside(os.path.realpath(path), dirs):
        return
    if _linked_device(path, dirs) is not None:
        return
    raise errors.Forbidden(
        "image is outside the allowed directories (images.allowed_dirs)")


def check_opened(fd, path, dirs):
    """
    Raise Forbidden unless the file open as `fd`, opened through `path`,
    is allowed in `dirs`. Blocks on the file system: call it from a pool
    thread.
    """
    if not dirs:
        return
    if _inside(os.path.realpath(f"/proc/self/fd/{fd}"), dirs):
        return
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode) and _linked_device(path, dirs) == st.st_rdev:
        return
    raise errors.Forbidden(
        "image is outside the allowed directories (images.allowed_dirs)")
