"""What every stage reads: settings (fields and configs), one-line errors, atomic files, labels."""
