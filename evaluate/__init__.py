"""LUMIR metrics (Dice, HD95, TRE, NDV) and the evaluation runner."""
