"""Train the testbed (resumable); with ``ship=true`` put its UNet into the package for `make run` to reuse."""
from __future__ import annotations

import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.testbed.build import WEIGHTS, spec_from_dict
from benchmark.testbed.train import train
from runners.common import CONF, check_config, launch_paths


@hydra.main(version_base="1.3", config_path=CONF, config_name="train_testbed")
def main(cfg: DictConfig) -> None:
    cfg = launch_paths(cfg)
    check_config(OmegaConf.to_container(cfg, resolve=True))  # before hours of training, not after
    spec = spec_from_dict(OmegaConf.to_container(cfg.testbed, resolve=True))
    folder = train(spec, Path(cfg.out), progress=cfg.progress)
    print(f"testbed written to {folder}")
    if cfg.ship:
        shipped = WEIGHTS[cfg.weights]
        shutil.rmtree(shipped, ignore_errors=True)
        shutil.copytree(folder / "unet", shipped / "unet")
        shutil.copy(folder / "testbed_spec.json", shipped / "testbed_spec.json")
        print(f"shipped to {shipped}")


if __name__ == "__main__":
    main()
