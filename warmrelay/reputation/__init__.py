"""Stage 9, the warmup controller: signals per (IP, provider) and day — SMTP-time rates,
out-of-band bounces and complaints, Microsoft SNDS, Gmail Postmaster Tools — and the
decisions they drive (advance, hold, back N, pause)."""
