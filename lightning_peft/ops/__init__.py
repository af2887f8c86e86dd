"""Operations on models with adapters attached."""
