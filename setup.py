from setuptools import find_packages, setup

import re

with open("imaged/__init__.py") as f:
    version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="imaged",
    version=version,
    description="Host daemon serving virtual disk images over HTTPS "
                "(ovirt-imageio compatible images API)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["imaged", "imaged.*"]),
    # The lab page of the `ui` app.
    package_data={"imaged": ["static/ui/*.html", "static/ui/*.js", "static/ui/*.css"]},
    install_requires=[
        "gevent>=21.1",
        "bottle>=0.12.19",
        "PyYAML>=5.3",
        "prometheus_client>=0.9",
        "PyJWT>=2.4",
        "cryptography>=3.4",
    ],
    extras_require={
        "test": ["pytest>=7", "WebTest>=3", "requests>=2.25"],
    },
    entry_points={
        "console_scripts": [
            "imaged = imaged.main:main",
            "imaged-client = imaged.client.cli:main",
        ],
    },
    data_files=[("share/imaged", ["config/imaged.yaml"])],
)
