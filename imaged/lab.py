"""
Lab mode: try imaged on a laptop, no root needed.

    python -m imaged.lab [--config config/lab.yaml]

Creates the lab state directory on first start (a self-signed certificate,
a sample image), prints how to add a session and fetch the image with curl,
then runs the daemon with the lab config.
"""

import argparse
import os
import subprocess
import sys

from . import config

SAMPLE_SIZE_BYTES = 64 * 1024**2


def ensure_certificate(cert_file, key_file, hostname="localhost"):
    """Generate a self-signed certificate unless one exists."""
    if os.path.exists(cert_file) and os.path.exists(key_file):
        return False
    os.makedirs(os.path.dirname(cert_file), exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key_file, "-out", cert_file, "-days", "365",
         "-subj", f"/CN={hostname}",
         "-addext", f"subjectAltName=DNS:{hostname},IP:127.0.0.1,IP:::1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(key_file, 0o600)
    return True


def ensure_sample_image(path):
    """A sparse sample image with a little data at its start."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"imaged lab sample image\n" * 1000)
        f.truncate(SAMPLE_SIZE_BYTES)


def instructions(cfg, image):
    control = next(lst["path"] for lst in cfg["listeners"]
                   if "sessions" in lst["apps"])
    cert = cfg["tls"]["cert_file"]
    return f"""
imaged lab is starting. In another shell:

  # Add a session allowing read and write of the sample image for 1 hour:
  curl --unix-socket {control} -X PUT \\
      -d '{{"url": "file://{image}", "size": {SAMPLE_SIZE_BYTES}, "ops": ["read", "write"], "timeout": 3600}}' \\
      http://localhost/sessions/lab-session-1

  # Download it over HTTPS (self-signed certificate of the lab):
  curl --cacert {cert} -o sample.raw https://localhost:54322/images/lab-session-1

  # Or over plain HTTP on loopback, or the local unix socket:
  curl -o sample.raw http://127.0.0.1:54323/images/lab-session-1
  curl --range 0-99 http://127.0.0.1:54323/images/lab-session-1

  # Upload (overwrite) the image, then see the session and progress:
  curl -T sample.raw http://127.0.0.1:54323/images/lab-session-1
  curl --unix-socket {control} http://localhost/sessions/lab-session-1
  curl --unix-socket {control} http://localhost/progress

Stop the daemon with Ctrl-C.
"""


def main(argv=None):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(prog="python -m imaged.lab")
    parser.add_argument("--config", default=os.path.join(here, "config", "lab.yaml"))
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        print(f"imaged lab: {args.config}: {e}", file=sys.stderr)
        return 2
    if ensure_certificate(cfg["tls"]["cert_file"], cfg["tls"]["key_file"]):
        print(f"generated a self-signed certificate: {cfg['tls']['cert_file']}")
    image_dir = (cfg["images"]["allowed_dirs"] or
                 [os.path.dirname(cfg["tls"]["cert_file"])])[0]
    image = os.path.join(image_dir, "sample.raw")
    ensure_sample_image(image)
    print(instructions(cfg, image), flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "imaged", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
