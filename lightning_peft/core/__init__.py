"""The ground floor: what every other part of lightning-peft builds on (nothing here imports anything above)."""
