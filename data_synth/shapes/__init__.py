"""The shapes world: scenes of coloured shapes with exact captions, a backbone and a CIR benchmark."""
