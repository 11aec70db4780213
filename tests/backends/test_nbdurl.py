"""NBD URL forms (imaged.backends.nbdurl): what session add takes and refuses."""

import pytest

from imaged import backends
from imaged import errors
from imaged.backends import nbdurl
from imaged.backends.nbdurl import Address


@pytest.mark.parametrize("url,address", [
    ("nbd:unix:/run/vdsm/nbd/a.sock",
     Address("unix", "", path="/run/vdsm/nbd/a.sock")),
    ("nbd:unix:/run/a.sock:exportname=sda",
     Address("unix", "sda", path="/run/a.sock")),
    # qemu's syntax takes the name literally, "/" and ":" included.
    ("nbd:unix:/run/a.sock:exportname=/dev/x:y",
     Address("unix", "/dev/x:y", path="/run/a.sock")),
    ("nbd:localhost:10809", Address("tcp", "", host="localhost", port=10809)),
    ("nbd:127.0.0.1:2000:exportname=vol",
     Address("tcp", "vol", host="127.0.0.1", port=2000)),
    ("nbd:[::1]:2000:exportname=vol", Address("tcp", "vol", host="::1", port=2000)),
    ("nbd://example.org:2000/vol", Address("tcp", "vol", host="example.org", port=2000)),
    ("nbd://example.org/vol", Address("tcp", "vol", host="example.org", port=10809)),
    ("nbd://127.0.0.1:2000/", Address("tcp", "", host="127.0.0.1", port=2000)),
    ("nbd://127.0.0.1:2000", Address("tcp", "", host="127.0.0.1", port=2000)),
    ("nbd://[::1]:2000/a%20b", Address("tcp", "a b", host="::1", port=2000)),
    # The NBD URI spec: a leading "/" of the name needs "//".
    ("nbd://h:1//abs", Address("tcp", "/abs", host="h", port=1)),
    ("nbd+unix:///vol?socket=/run/a.sock", Address("unix", "vol", path="/run/a.sock")),
    ("nbd+unix:///?socket=/run/a.sock", Address("unix", "", path="/run/a.sock")),
    ("nbd+unix://?socket=/run/a.sock", Address("unix", "", path="/run/a.sock")),
])
def test_parse(url, address):
    assert nbdurl.parse(url) == address
    assert nbdurl.is_nbd(url)
    backends.check_url(url)
    # Capabilities of NBD exports come from the server.
    assert backends.static_capabilities(url) is None


@pytest.mark.parametrize("url", [
    "nbd:",
    "nbd:unix:",
    "nbd:unix:relative.sock",
    "nbd:unix:/",
    "nbd:unix:/run/a.sock:export=x",
    "nbd:host",
    "nbd:host:",
    "nbd:host:port",
    "nbd:host:0",
    "nbd:host:70000",
    "nbd:host:123456",
    "nbd:ho st:10809",
    "nbd://",
    "nbd:///vol",
    "nbd://host:99999/vol",
    "nbd://host:x/vol",
    "nbd://user@host/vol",
    "nbd://host/vol?tls=on",
    "nbd://host/vol#frag",
    "nbd+unix:///vol",
    "nbd+unix:///vol?socket=",
    "nbd+unix:///vol?socket=rel.sock",
    "nbd+unix:///vol?socket=/a&socket=/b",
    "nbd+unix:///vol?socket=/a&tls=on",
    "nbd+unix://host/vol?socket=/a",
    "nbd+unix:///%ff?socket=/a",
    "nbd:unix:/run/a\0.sock",
    "nbd:unix:/run/a.sock:exportname=a\nb",
    "nbd:unix:/" + "x" * 200,
    "nbd:unix:/a:exportname=" + "x" * 5000,
])
def test_parse_invalid(url):
    with pytest.raises(nbdurl.InvalidURL):
        nbdurl.parse(url)
    with pytest.raises(errors.BadRequest) as e:
        backends.check_url(url)
    assert e.value.message.startswith("invalid url:")


def test_file_urls_are_not_nbd():
    assert not nbdurl.is_nbd("file:///var/tmp/image")
    assert backends.static_capabilities("file:///var/tmp/x").fixed_size is False
