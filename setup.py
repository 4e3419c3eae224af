"""Package list for setuptools: maps the top-level envs/, policies/ and conf/ into rlplat.*, and
adds rlplat's Hydra launchers (hydra_plugins/rlplat_launchers).

Everything else lives in pyproject.toml; this file only exists because a static package list
cannot express "every sub-package of envs/ installs under rlplat.envs".
"""

from setuptools import find_packages, setup

_MAPPED = {"rlplat.envs": "envs", "rlplat.policies": "policies", "rlplat.conf": "conf"}

packages = find_packages(include=["rlplat", "rlplat.*"])
package_dir = {"rlplat": "rlplat"}
for name, folder in _MAPPED.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

# rlplat's Hydra launchers: Hydra loads plugins only from the hydra_plugins namespace.
packages.append("hydra_plugins.rlplat_launchers")
package_dir["hydra_plugins.rlplat_launchers"] = "hydra_plugins/rlplat_launchers"

setup(packages=packages, package_dir=package_dir)
