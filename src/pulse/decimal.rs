//! Exact decimal arithmetic shared by everything that sums amounts: the window
//! operator's accumulators and the meter queries that fold stored windows.

use rust_decimal::Decimal;

/// `a + b` if representable without rounding. rust_decimal rounds (drops scale) when
/// the exact sum needs more than 96 bits; a smaller result scale betrays that.
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    // The amounts of one product mostly share a scale: then the sum of the mantissas (an
    // i128 holds any two 96-bit ones) is exact, or does not fit. Twice as fast as
    // rust_decimal's general addition, which the other cases take.
    if a.scale() == b.scale() {
        return Decimal::try_from_i128_with_scale(a.mantissa() + b.mantissa(), a.scale()).ok();
    }
    let sum = a.checked_add(b)?;
    (sum.scale() >= a.scale().max(b.scale())).then_some(sum)
}
