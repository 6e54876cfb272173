"""Jobs other than the RL loop: offline DPO and reward-model training / evaluation."""
