//! Cache-line-aligned buffers for the quantized activations and unpacked weight panels the
//! kernels read with 64-byte vector loads: an unaligned 64-byte load touches two cache
//! lines, which costs a second load-port slot on every load of the inner loops.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Element types for which all-zero bytes are a valid value.
pub trait Plain: Copy + sealed::Sealed {}
impl Plain for i8 {}
impl Plain for i16 {}
impl Plain for i32 {}
impl Plain for f32 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for i8 {}
    impl Sealed for i16 {}
    impl Sealed for i32 {}
    impl Sealed for f32 {}
}

/// A fixed-length, zero-initialised, 64-byte-aligned array of `T`.
#[derive(Clone)]
pub struct AlignedVec<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _element: PhantomData<T>,
}

impl<T: Plain> AlignedVec<T> {
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        AlignedVec {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _element: PhantomData,
        }
    }

    /// Makes the array `len` long, keeping the allocation when it is large enough, so a
    /// buffer reused across calls costs no fresh pages. Elements that existed keep their
    /// values; new ones are zero.
    pub fn set_len(&mut self, len: usize) {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0; 64]));
        }
        self.len = len;
    }
}

impl<T: Plain> Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len * size_of::<T>()` initialised bytes, aligned
        // to 64 (enough for any `Plain` type), and every bit pattern is a valid `T`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        let mut v = AlignedVec::<f32>::zeroed(37);
        assert_eq!(v.len(), 37);
        assert_eq!(v.as_ptr() as usize % 64, 0);
        assert!(v.iter().all(|&x| x == 0.0));
        v[36] = 2.5;
        assert_eq!(v[36], 2.5);
        let w = v.clone();
        assert_eq!(w[36], 2.5);
        v.set_len(10);
        assert_eq!((v.len(), v.as_ptr() as usize % 64), (10, 0));
        v.set_len(1000);
        assert_eq!(v.len(), 1000);
        assert_eq!((v[36], v[999]), (2.5, 0.0));
    }
}
