"""Packages and console scripts; everything else is in pyproject.toml.

`pip install .` installs the product and its two siblings, the sandbox and the demo.
With CERTYO_PRODUCT_ONLY=1 only `certyo_dagster` is installed, with `certyo-proof` only: the
user-code image (deploy/Dockerfile) holds the product alone.
"""

import os

from setuptools import find_packages, setup

PRODUCT_ONLY = os.environ.get("CERTYO_PRODUCT_ONLY", "").strip() == "1"
PACKAGES = (
    ["certyo_dagster*"] if PRODUCT_ONLY else ["certyo_dagster*", "certyo_sandbox*", "certyo_demo*"]
)
# certyo-proof is the product's own (auditors export and verify bundles with it).
SCRIPTS = ["certyo-proof = certyo_dagster.proof_cli:main"] + (
    []
    if PRODUCT_ONLY
    else ["certyo-sandbox = certyo_sandbox.cli:main", "certyo-demo = certyo_demo.cli:main"]
)
# `dg list components` finds certyo_dagster.CertyoCollection through this entry point, in this
# project and in any project that installs certyo-dagster.
DG_REGISTRY = ["certyo_dagster = certyo_dagster"]

setup(
    packages=find_packages(include=PACKAGES),
    entry_points={"console_scripts": SCRIPTS, "dagster_dg_cli.registry_modules": DG_REGISTRY},
)
