"""troupe's Hydra configs, installed as package data of `troupe.conf`: config.yaml (the defaults), the recipes
(demo, gsm8k, chat_armo, ...) and the config groups (algo/, autoscale/)."""
